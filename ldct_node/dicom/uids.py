"""UIDs derived from names: the one rule by which ldct-node turns what an instance is made from into its UID.

The derived series (ldct_node.dicom.derive) and the simulated low-dose series (ldct_train.simulate) both
name what their UIDs depend on and pass the names here, so a re-run with the same inputs writes the
same UIDs (a replacement in PACS, never a duplicate) and different inputs different ones.

The outputs must never change: PACS relies on derived UIDs being stable across versions, and
tests/test_derive.py pins them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from pydicom.uid import UID, generate_uid

# The 2.25 arc holds the integer of a 128-bit UUID and needs no registered root.
UUID_ROOT = "2.25."
# Namespace of everything ldct-node itself names: derived instances, the implementation class.
NODE_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "ldct-node")
# Namespace of the simulated low-dose series (ldct_train.simulate).
SIMULATE_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "ldct-node simulate")
# Joins the parts of a name. It cannot occur in UIDs or model names, so distinct parts never join
# into the same name.
SEPARATOR = "\x1f"


def name_uid(namespace: uuid.UUID, parts: Iterable[str], root: str = UUID_ROOT) -> UID:
    """A UID that depends only on namespace, parts (in order) and root.

    Under the 2.25 root it is a name-based UUID (RFC 4122 version 5) of the joined parts in
    namespace. pydicom's generate_uid(prefix, entropy_srcs) appends a 59-digit SHA-512 number,
    which under 2.25 is not a UUID (the arc holds 128-bit UUID integers only), so it serves only any
    other root, which is a site's own; the namespace does not enter that hash.
    """
    name = SEPARATOR.join(parts)
    if root == UUID_ROOT:
        return UID(f"{UUID_ROOT}{uuid.uuid5(namespace, name).int}")
    return generate_uid(root, entropy_srcs=[name])
