"""Repairs: a job row is a scan or a repair of one (``kind``), and a repair names its scan (``parent_id``).

Every row made before this revision is a scan.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("scans") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="scan"))
        batch.add_column(sa.Column("parent_id", sa.String(32)))
        batch.create_index("ix_scans_kind", ["kind"])
        batch.create_index("ix_scans_parent_id", ["parent_id"])


def downgrade() -> None:
    with op.batch_alter_table("scans") as batch:
        batch.drop_index("ix_scans_parent_id")
        batch.drop_index("ix_scans_kind")
        batch.drop_column("parent_id")
        batch.drop_column("kind")
