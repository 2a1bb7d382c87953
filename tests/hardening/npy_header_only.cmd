run quadratic.ein --input Q=q_header_only.npy --out {out}
