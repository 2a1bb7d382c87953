run quadratic.ein --input Q=q_not_npy.npy --out {out}
