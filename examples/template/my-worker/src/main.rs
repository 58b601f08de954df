//! The worker: serves every task of the crates it names. Its flags
//! (`--namespace`, `--nthreads`, `--data-addr`, ...) and their
//! `FLOTILLA_*` variables are listed by `my-worker --help`.

// Naming the task crates is what links them into this binary; a worker
// that would serve none of your tasks refuses to start. `state = ...`
// names what each worker builds once and lends to its tasks.
flotilla::worker_main!(my_tasks; state = my_tasks::init);
