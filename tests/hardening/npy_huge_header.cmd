run quadratic.ein --input Q=q_huge_header.npy --out {out}
