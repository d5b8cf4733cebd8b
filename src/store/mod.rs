//! Where the gateway's state is kept. In embedded mode (the default) that
//! is one SQLite file in the data directory, whose schema is owned by
//! [`schema`] alone: numbered migrations, each run once, in order.

pub mod schema;
