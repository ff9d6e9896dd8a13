//! The pipeline in-process: a message merged into the copy of the same upload is released
//! only when that copy ended, so its offset cannot be committed while the file is in flight.

use std::sync::Arc;
use std::time::Duration;

use crate::util::*;
use dcache_sim::Fault;
use dcflow_core::{Config, Env};
use dcflow_workflow::{Admission, Pipeline};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merged_message_waits_for_the_copy_it_joined() {
    let site = Site::new().await;
    let door_path = site.upload("m/slow.dat", &data(400_000, 1)).await;
    site.sim.add_fault(
        &door_path,
        Fault::SlowLink {
            bytes_per_second: 400_000,
        },
        None,
    );
    let messages = site.sim.billing_messages();
    assert_eq!(
        messages.len(),
        2,
        "pool transfer and door request of one upload"
    );
    let config = Config::load(&site.write_config(&site.proxy_auth(), ""), &Env::default()).unwrap();
    let pipeline = Arc::new(Pipeline::try_new(&config, None).unwrap());

    let Admission::Run(task) = pipeline.admit(messages[0].as_bytes(), "first").await else {
        panic!("the first message of an upload starts its copy");
    };
    let Admission::Merged(merged) = pipeline.admit(messages[1].as_bytes(), "second").await else {
        panic!("the second message of the same upload is merged");
    };
    let p = pipeline.clone();
    let copy = tokio::spawn(async move { p.run(task).await });
    let waiting = tokio::spawn(merged.wait());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "released while the copy was still running"
    );
    copy.await.unwrap().expect("recorded");
    assert!(
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("released when the copy ended")
            .unwrap(),
        "the merged message learns that the outcome is recorded"
    );
    assert!(site.download().join("m/slow.dat").exists());

    // After the copy, the same upload again is simply skipped.
    assert!(matches!(
        pipeline.admit(messages[0].as_bytes(), "again").await,
        Admission::Skip
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_the_folder_are_dismissed_unparsed_and_counted_as_not_uploads() {
    let site = Site::new().await;
    site.upload("r/f.dat", &data(1_000, 2)).await;
    let upload = site.sim.billing_messages()[0].clone();
    let config = Config::load(&site.write_config(&site.proxy_auth(), ""), &Env::default()).unwrap();
    let pipeline = Pipeline::try_new(&config, None).unwrap();
    // dcflow's own copy of the file, as dCache bills it: the pool's transfer, a read.
    let read = upload.replace(r#""isWrite":"write""#, r#""isWrite":"read""#);
    assert_ne!(read, upload);
    let elsewhere = upload.replace(&site.sim.namespace_path("/"), "/pnfs/another.org/");
    assert_ne!(elsewhere, upload);
    assert!(pipeline.dismisses(read.as_bytes()));
    assert!(pipeline.dismisses(elsewhere.as_bytes()));
    assert!(
        !pipeline.dismisses(upload.as_bytes()),
        "an upload is parsed"
    );
    pipeline.dismissed(2);
    let stats = &pipeline.stats;
    assert_eq!(
        (
            stats.events.get(),
            stats.not_upload.get(),
            stats.outside_folder.get()
        ),
        (2, 1, 1)
    );
}
