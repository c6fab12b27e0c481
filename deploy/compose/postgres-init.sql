-- The security servers' message logs, each in its own database owned by the gateway's
-- role (the registry's database is POSTGRES_DB). Run once, when the volume is created.
CREATE DATABASE ss_msp OWNER gateway;
CREATE DATABASE ss_dnic OWNER gateway;
