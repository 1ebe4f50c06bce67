//! The driver's side of the write path: queueing writes for the writer in
//! order, holding them back (and pausing dispatches and loads) while its
//! queue is full, and flushing at shutdown.

use super::*;

impl Driver {
    /// Queues a write for the writer, in order. When its queue is full the
    /// write waits in the driver's backlog (never in a task of its own),
    /// and so does every later one; dispatching and loading pause until
    /// the backlog has drained ([`Driver::drain_backlog`]).
    pub(super) fn send_write(&mut self, job: WriteJob) {
        if !self.write_backlog.is_empty() {
            self.write_backlog.push_back(job);
            return;
        }
        match self.writer.try_send(job) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(job)) => {
                tracing::warn!(
                    "the database writer is behind: dispatching pauses until its queue drains"
                );
                self.write_backlog.push_back(job);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::error!("the database writer stopped; results are not being recorded");
            }
        }
    }

    /// Moves backlogged writes into the writer's queue while it has room;
    /// once none wait, starts the dispatches and loads that waited.
    pub(super) fn drain_backlog(&mut self) {
        while let Some(job) = self.write_backlog.pop_front() {
            match self.writer.try_send(job) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(job)) => {
                    self.write_backlog.push_front(job);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    tracing::error!("the database writer stopped; results are not being recorded");
                    self.write_backlog.clear();
                }
            }
        }
        tracing::info!("the database writer caught up: dispatching again");
        self.start_deferred_dispatches();
        self.start_load();
    }

    /// Starts the dispatches held back, in order, until one finds the
    /// writes backlogged again.
    pub(super) fn start_deferred_dispatches(&mut self) {
        while let Some((drv_path, machine, build)) = self.deferred_dispatches.pop_front() {
            self.dispatch(drv_path, machine, build);
            if !self.write_backlog.is_empty() {
                return;
            }
        }
    }

    /// Waits, up to the configured shutdown timeout, for the writer to
    /// commit what is queued, the backlog included. No new write is queued
    /// by the driver after this starts; background tasks still holding a
    /// sender (a preparation in flight) may add theirs until they end.
    pub(super) async fn flush(self) -> Flushed {
        let Driver {
            writer,
            writer_task,
            writer_in_flight,
            write_backlog,
            config,
            ..
        } = self;
        let pending = writer.max_capacity() - writer.capacity()
            + writer_in_flight.get()
            + write_backlog.len();
        let started = Instant::now();
        let flushing = async move {
            for job in write_backlog {
                if writer.send(job).await.is_err() {
                    break;
                }
            }
            drop(writer);
            let _ = writer_task.await;
        };
        match tokio::time::timeout(config.shutdown_timeout, flushing).await {
            Ok(_) => Flushed::Done {
                pending,
                took: started.elapsed(),
            },
            Err(_) => Flushed::TimedOut {
                pending,
                after: config.shutdown_timeout,
            },
        }
    }
}
