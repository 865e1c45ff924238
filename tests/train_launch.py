"""Runs mm_train's main with the temporary data stand-in when mm_train.data is not there yet."""

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    if importlib.util.find_spec("mm_train.data") is None:
        from tests.train_data_standin import install

        install()
    from mm_train.training import main

    sys.exit(main())
