//! placeholder: confined root (being written)
