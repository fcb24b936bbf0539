//! Text -> image for one batch.
