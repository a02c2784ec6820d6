#!/usr/bin/env python3
"""A command-form trainer that ignores its stop file (see tests/trainers.py: curve_command_main)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.trainers import curve_command_main  # noqa: E402

sys.exit(curve_command_main())
