run quadratic.ein -D M=65536 --out {out}
