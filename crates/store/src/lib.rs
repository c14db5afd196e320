//! kas's records: projects, agents and tokens (stored only as SHA-256 digests). SQLite embedded
//! by default; PostgreSQL when kas scales out.
