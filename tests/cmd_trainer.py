#!/usr/bin/env python3
"""A command-form trainer used by the tests (see tests/trainers.py: command_main)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.trainers import command_main  # noqa: E402

sys.exit(command_main())
