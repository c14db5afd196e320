// `sqlx::migrate!` embeds the migration files at compile time, but stable Rust gives proc macros
// no way to tell Cargo about the files they read; without this, editing a migration would not
// trigger a rebuild and the binary would silently ship the old schema.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
