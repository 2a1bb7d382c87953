run quadratic.ein --max-elements 100 --out {out}
