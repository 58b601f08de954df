//! Tasks used by the seed's lifecycle examples.
