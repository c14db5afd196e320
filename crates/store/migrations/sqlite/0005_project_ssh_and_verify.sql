-- SSH remotes and signed-commit verification. As for credentials, only paths of files are
-- stored: the deploy key, the pinned host keys (known_hosts), and the trusted signing keys (an
-- SSH allowed-signers file, an armored OpenPGP keyring).
ALTER TABLE projects ADD COLUMN ssh_key_file TEXT;
ALTER TABLE projects ADD COLUMN known_hosts_file TEXT;
ALTER TABLE projects ADD COLUMN verify_allowed_signers_file TEXT;
ALTER TABLE projects ADD COLUMN verify_gpg_keyring_file TEXT;
