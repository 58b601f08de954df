//! The registration: workers find each task by name and fingerprint, decode
//! its arguments, run it and encode its output or error.

use flotilla::__private::{
    decode_args, encode_output, inventory, Invocation, Task, TaskRegistration,
};
use flotilla::{State, TaskContext, WorkerState};
use std::task::{Context, Poll, Waker};

#[flotilla::task]
fn add(x: i64, y: i64) -> i64 {
    x + y
}

#[flotilla::task]
fn halve(x: i64) -> Result<i64, String> {
    if x % 2 == 0 {
        Ok(x / 2)
    } else {
        Err(format!("{x} is odd"))
    }
}

#[flotilla::task(name = "tests.echo")]
async fn echo(ctx: TaskContext, text: String) -> String {
    let _ = &ctx;
    text
}

/// A value a worker lends its tasks.
struct Scale(i64);

/// Takes the worker's state between its arguments.
#[flotilla::task]
async fn scale(ctx: TaskContext, x: i64, factor: State<Scale>, y: i64) -> i64 {
    let _ = &ctx;
    (x + y) * factor.0
}

fn registration<T: Task>(_task: T) -> &'static TaskRegistration {
    inventory::iter::<TaskRegistration>
        .into_iter()
        .find(|registration| registration.name() == T::NAME)
        .expect("every task is registered")
}

fn run<T: Task>(task: T, ctx: TaskContext, args: &T::Args) -> Result<Vec<u8>, String> {
    let registration = registration(task);
    assert_eq!(registration.fingerprint(), T::FINGERPRINT);
    let args = encode_output(args).expect("arguments encode");
    let outcome = match registration.invoke(ctx, &args) {
        Invocation::Ready(outcome) => outcome,
        Invocation::Sync(run) => run(),
        Invocation::Async(mut future) => {
            // The async task here never waits, so one poll completes it.
            match future
                .as_mut()
                .poll(&mut Context::from_waker(Waker::noop()))
            {
                Poll::Ready(outcome) => outcome,
                Poll::Pending => panic!("the task should complete at once"),
            }
        }
    };
    outcome
        .map(flotilla_proto::Encoded::into_vec)
        .map_err(|error| format!("{error:?}"))
}

fn output<T: Task>(bytes: &[u8]) -> T::Output {
    decode_args(T::NAME, bytes).expect("output decodes")
}

#[test]
fn compiles_and_runs() {
    let ctx = TaskContext::new("key", "task", "worker", flotilla::Config::default());
    let sum = run(add, ctx.clone(), &(2, 3)).unwrap();
    assert_eq!(output::<add>(&sum), 5);

    let half = run(halve, ctx.clone(), &(8,)).unwrap();
    assert_eq!(output::<halve>(&half), 4);
    let odd = run(halve, ctx.clone(), &(7,)).unwrap_err();
    assert!(odd.contains("7 is odd"), "{odd}");

    assert_eq!(<echo as Task>::NAME, "tests.echo");
    let echoed = run(echo, ctx.clone(), &(String::from("hi"),)).unwrap();
    assert_eq!(output::<echo>(&echoed), "hi");

    let registration = registration(add);
    let bad = match registration.invoke(ctx, b"not msgpack") {
        Invocation::Ready(outcome) => outcome.unwrap_err(),
        _ => panic!("arguments that do not decode are refused at once"),
    };
    assert!(format!("{bad:?}").contains("add"), "{bad:?}");
}

#[test]
fn state_parameters_come_from_the_workers_state() {
    let ctx = TaskContext::new("key", "task", "worker", flotilla::Config::default());
    let with_state = ctx
        .clone()
        .with_state(WorkerState::new().with(Scale(10)).into());
    let scaled = run(scale, with_state, &(1, 2)).unwrap();
    assert_eq!(output::<scale>(&scaled), 30);

    // A worker without it fails the task, naming the type.
    let missing = run(scale, ctx, &(1, 2)).unwrap_err();
    assert!(missing.contains("flotilla::MissingState"), "{missing}");
    assert!(missing.contains("no state of type"), "{missing}");
    assert!(missing.contains("Scale"), "{missing}");
}
