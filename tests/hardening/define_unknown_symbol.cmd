compile quadratic.ein --emit ir -D Mx=4 -D n=3 -D M=8
