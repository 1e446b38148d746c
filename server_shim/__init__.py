"""OpenAI-compatible test server ("the shim"): one model, many quantization schemes and faults.

Importing the package pins MKL's GEMMs to their strict reproducible mode (`MKL_CBWR=AUTO,STRICT`)
unless the environment already says otherwise. Why: the shim is the correct server the batch-slot
check is calibrated on, so a row's numbers must not depend on how many rows share the call. MKL's
default threading splits a float32 GEMM of 5-7 or 9-11 rows by rows, the last rows on another
thread and another kernel tail: identical inputs came out up to 3e-5 apart (torch 2.13 CPU, MKL
2024.2, AMD EPYC with AVX-512, 2 threads, 2026-12-07; one thread, or 1-4, 8 and 12-299 rows: 0.0).
In strict mode every row count gave identical rows. MKL reads the variable at its first call, so
this must run before the process's first matmul; it does nothing where torch uses no MKL.
"""

import os

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
