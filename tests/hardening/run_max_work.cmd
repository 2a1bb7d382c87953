run quadratic.ein --max-work 100 --out {out}
