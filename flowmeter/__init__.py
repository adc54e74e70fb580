"""flowmeter: an IPFIX (RFC 7011) flow exporter for Linux gateways and overlay networks."""
import os

# numpy's OpenBLAS starts one spinning thread per core when numpy is imported; flowmeter does no
# linear algebra, and those threads took about 0.1 s of CPU from the pipeline at every start.
# An operator's own setting is kept.
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_name, "1")
del _name
