//! `flotilla-worker`: a worker serving Flotilla's example tasks and actors
//! (the crate `flotilla_examples`). A worker for your own tasks is written
//! the same way: `flotilla::worker_main!(my_tasks);`.

flotilla::worker_main!(flotilla_examples);
