"""The MLflow server's admin account, written before the server starts, its password hashed
for a machine-made secret.

MLflow's basic-auth app checks the password hash on every request. Its default, werkzeug's
scrypt, costs ~0.13 s per check on a 2-core machine (seconds under load), so a pipeline's few
hundred registry calls spent minutes hashing. Key stretching protects passwords a person could
guess; this one is 128 random bits (`_HttpServer.secret`), which no stretching makes safer, so
the hash is PBKDF2 with 1,000 rounds (~1 ms). MLflow finds the account on start and leaves it.
"""

from __future__ import annotations

from pathlib import Path

from werkzeug.security import check_password_hash, generate_password_hash

HASH_METHOD = "pbkdf2:sha256:1000"


def seed_admin(database: Path, username: str, password: str) -> None:
    """Create `username` as admin in MLflow's auth database (its schema made by MLflow's own
    store), or re-hash its password with HASH_METHOD when it has another hash; idempotent."""
    from mlflow.server.auth.db.models import SqlUser
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore()
    store.init_db(f"sqlite:///{database}")
    if not store.has_user(username, use_primary=True):
        store.create_user(username, password, is_admin=True)
    with store.ManagedSessionMaker(read_only=False) as session:
        user = session.query(SqlUser).filter(SqlUser.username == username).one()
        if not user.password_hash.startswith(f"{HASH_METHOD}$") or not check_password_hash(
            user.password_hash, password
        ):
            user.password_hash = generate_password_hash(password, method=HASH_METHOD)
