// Rebuild when a migration is added, so that `embed_migrations!` embeds it (the
// practice the diesel_migrations documentation recommends).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
