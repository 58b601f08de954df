//! Example tasks that coordinate through Flotilla's distributed primitives
//! (the seed's Queue, Lock, Event and Variable examples).
