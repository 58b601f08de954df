//! `flotilla-worker`: a worker serving Flotilla's example tasks.
//! A worker for your own tasks is your task crate plus
//! `fn main() { flotilla_worker::main() }`.

fn main() {
    flotilla_examples::worker_main()
}
