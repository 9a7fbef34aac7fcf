"""Create the scans and workers tables.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    timestamp = sa.DateTime(timezone=True)
    op.create_table(
        "scans",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", timestamp, nullable=False),
        sa.Column("updated_at", timestamp, nullable=False),
        sa.Column("started_at", timestamp),
        sa.Column("finished_at", timestamp),
        sa.Column("progress_fraction", sa.Float, nullable=False),
        sa.Column("progress_stage", sa.String(64), nullable=False),
        sa.Column("progress_message", sa.String(500), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("heartbeat_at", timestamp),
        sa.Column("worker_id", sa.String(200)),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("model_filename", sa.String(255), nullable=False),
        sa.Column("model_sha256", sa.String(64), nullable=False),
        sa.Column("model_size_bytes", sa.Integer, nullable=False),
        sa.Column("model_format", sa.String(32), nullable=False),
        sa.Column("data_filename", sa.String(255)),
        sa.Column("data_sha256", sa.String(64)),
        sa.Column("data_size_bytes", sa.Integer),
        sa.Column("training_data_filename", sa.String(255)),
        sa.Column("training_data_sha256", sa.String(64)),
        sa.Column("training_data_size_bytes", sa.Integer),
        sa.Column("options_json", sa.Text, nullable=False),
        sa.Column("dedup_key", sa.String(64), nullable=False),
        sa.Column("idempotency_key", sa.String(255), unique=True),
        sa.Column("verdict", sa.String(32)),
        sa.Column("result_json", sa.Text),
        sa.Column("error_code", sa.String(64)),
        sa.Column("error_detail", sa.Text),
        sa.Column("duration_s", sa.Float),
    )
    op.create_index("ix_scans_status", "scans", ["status"])
    op.create_index("ix_scans_created_at", "scans", ["created_at"])
    op.create_index("ix_scans_model_sha256", "scans", ["model_sha256"])
    op.create_index("ix_scans_dedup_key", "scans", ["dedup_key"])
    op.create_table(
        "workers",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("device", sa.String(32), nullable=False),
        sa.Column("started_at", timestamp, nullable=False),
        sa.Column("heartbeat_at", timestamp, nullable=False),
    )
    op.create_index("ix_workers_heartbeat_at", "workers", ["heartbeat_at"])


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_table("scans")
