"""Job classes for tests/test_routes.py whose annotations `typing.get_type_hints` cannot resolve (a name only a type
checker imports), as in many apps' modules."""
from __future__ import annotations
from dataclasses import dataclass
from typing import Optional, TYPE_CHECKING
from cjm_workers.testing import ReferenceJob
if TYPE_CHECKING:
    from decimal import Decimal


@dataclass
class HintedJob(ReferenceJob):
    owner: Optional[int] = None  # a numeric user id
    cost: Optional[Decimal] = None  # (what makes get_type_hints fail)
