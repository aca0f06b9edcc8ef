//! Placeholder: the DR controller is not implemented yet (see issue "DR controller").
