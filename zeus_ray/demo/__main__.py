"""`python -m zeus_ray.demo` (what `make run` calls): the demo cohort, end to end."""
import sys

from .cohort import main

sys.exit(main())
