"""``python -m moto.server`` for the test suite, with one moto bug worked around (tests only, never shipped).

moto 5.2.5 computes an object's ETag lazily, reading the object's shared buffer without the lock its
``value`` getter takes: a HEAD or LIST racing a GET of the same key can hash a partial read and cache a
wrong ETag for good. The sidecar believes the store's single-part ETag (as it must with R2 and S3), so
that race made it store a second copy under the variant key. Here the ETag is computed under the key's
own lock.
"""

from __future__ import annotations

import sys
from typing import Any

from moto.s3 import models
from moto.server import main

_lazy_etag = models.FakeKey.etag.fget


def _locked_etag(self: Any) -> str:
    with self.lock:
        return str(_lazy_etag(self))  # type: ignore[misc]


models.FakeKey.etag = property(_locked_etag)  # type: ignore[assignment,method-assign]

if __name__ == "__main__":
    main(sys.argv[1:])
