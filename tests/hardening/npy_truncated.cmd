run quadratic.ein --input Q=q_truncated.npy --out {out}
