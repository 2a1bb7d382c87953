run quadratic.ein --input Q=q_int64.npy --out {out}
