"""Every test, and every process a test starts (they inherit this environment), computes on one
thread: the tensors are tiny, so a second thread gains little, and on a busy 2-core machine (CI)
threads that wait on each other made single runs up to ten times slower."""
import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported, here or in a subprocess
