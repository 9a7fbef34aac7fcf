"""One reusable scan per upload: a unique index over the dedup key of queued, running and succeeded scans.

Without it, identical uploads sent at the same instant each found no scan to reuse and each inserted one. A
database may already hold such duplicates; none is deleted or changed in status (their ids and results stay
valid). The newest reusable scan of an upload stays the one that answers it (``JobStore.reusable`` returns the
newest), and every older reusable scan of the same upload gets ``duplicate_of`` = that scan's id, which keeps it
out of the index.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

REUSABLE = ("queued", "running", "succeeded")
ONE_PER_UPLOAD = sa.text("status IN ('queued', 'running', 'succeeded') AND duplicate_of IS NULL")


def upgrade() -> None:
    with op.batch_alter_table("scans") as batch:
        batch.add_column(sa.Column("duplicate_of", sa.String(32)))
    scans = sa.table(
        "scans",
        sa.column("id", sa.String),
        sa.column("status", sa.String),
        sa.column("created_at", sa.DateTime),
        sa.column("dedup_key", sa.String),
        sa.column("duplicate_of", sa.String),
    )
    connection = op.get_bind()
    reusable = scans.c.status.in_(REUSABLE)
    duplicated = connection.scalars(
        sa.select(scans.c.dedup_key).where(reusable).group_by(scans.c.dedup_key).having(sa.func.count() > 1)
    ).all()
    for dedup_key in duplicated:
        newest, *older = connection.scalars(
            sa.select(scans.c.id)
            .where(reusable, scans.c.dedup_key == dedup_key)
            .order_by(scans.c.created_at.desc(), scans.c.id.desc())
        ).all()
        connection.execute(sa.update(scans).where(scans.c.id.in_(older)).values(duplicate_of=newest))
    op.create_index(
        "uq_scans_live_dedup_key",
        "scans",
        ["dedup_key"],
        unique=True,
        sqlite_where=ONE_PER_UPLOAD,
        postgresql_where=ONE_PER_UPLOAD,
    )


def downgrade() -> None:
    op.drop_index("uq_scans_live_dedup_key", "scans")
    with op.batch_alter_table("scans") as batch:
        batch.drop_column("duplicate_of")
