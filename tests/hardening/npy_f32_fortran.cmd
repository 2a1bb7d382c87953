run quadratic.ein --input Q=q_f32_fortran.npy --out {out}
