run quadratic.ein --input Q=q_wrong_shape.npy --out {out}
