"""``python -m mm_train`` (also the ``mm-train`` console script).

The main guard matters: megatron-core's checkpoint writer starts processes that re-import ``__main__``.
"""

from mm_train.cli import console_main

if __name__ == "__main__":
    console_main()
