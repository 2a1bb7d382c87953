run huge_reduction.ein --out {out}
