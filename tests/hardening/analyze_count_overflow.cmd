analyze huge_reduction.ein
