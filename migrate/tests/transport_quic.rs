//! Loopback QUIC with mutual TLS: pinned peers connect; unpinned clients and servers are refused
//! at the handshake.

use mig_migrate::transport::{
    accept, connect, endpoint, peer_fingerprint, AllowedPeers, Identity, Peer, TlsError,
};
use std::collections::HashSet;
use std::time::Duration;

fn ident(name: &str) -> Identity {
    Identity::generate(name).unwrap()
}

fn allowed(ids: &[&Identity]) -> AllowedPeers {
    AllowedPeers::new(ids.iter().map(|i| i.fingerprint().to_string()).collect())
}

fn peer(name: &str, ep: &quinn::Endpoint, fingerprint: &str) -> Peer {
    Peer {
        name: name.into(),
        address: ep.local_addr().unwrap(),
        fingerprint: fingerprint.into(),
    }
}

fn any() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test]
async fn pinned_peers_connect_and_see_each_other() {
    let (a, b) = (ident("host-a"), ident("host-b"));
    let server = endpoint(any(), &b, allowed(&[&a])).unwrap();
    let client = endpoint(any(), &a, allowed(&[&b])).unwrap();
    let srv = tokio::spawn({
        let server = server.clone();
        async move {
            let conn = accept(&server).await.unwrap().unwrap();
            let fp = peer_fingerprint(&conn);
            let (mut s, mut r) = conn.accept_bi().await.unwrap();
            let got = r.read_to_end(100).await.unwrap();
            s.write_all(&got).await.unwrap();
            s.finish().unwrap();
            let _ = s.stopped().await;
            fp
        }
    });
    let conn = connect(&client, &a, &peer("host-b", &server, b.fingerprint()))
        .await
        .unwrap();
    assert_eq!(
        conn.handshake_data()
            .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|d| d.protocol),
        Some(b"mig/1".to_vec())
    );
    assert_eq!(peer_fingerprint(&conn).as_deref(), Some(b.fingerprint()));
    let (mut s, mut r) = conn.open_bi().await.unwrap();
    s.write_all(b"ping").await.unwrap();
    s.finish().unwrap();
    assert_eq!(r.read_to_end(100).await.unwrap(), b"ping");
    assert_eq!(srv.await.unwrap().as_deref(), Some(a.fingerprint()));
}

#[tokio::test]
async fn unpinned_client_refused_at_handshake() {
    let (a, b, mallory) = (ident("host-a"), ident("host-b"), ident("mallory"));
    let server = endpoint(any(), &b, allowed(&[&a])).unwrap();
    let client = endpoint(any(), &mallory, AllowedPeers::default()).unwrap();
    let srv = tokio::spawn({
        let server = server.clone();
        async move { accept(&server).await.unwrap() }
    });
    let res = connect(&client, &mallory, &peer("host-b", &server, b.fingerprint())).await;
    // The server refuses the certificate during the handshake; the client sees either a failed
    // handshake or a connection closed with the TLS alert before any stream works.
    eprintln!(
        "client side of the refused handshake: {:?}",
        res.as_ref().map(|_| "connected, then closed")
    );
    let said = match res {
        Ok(conn) => {
            let err = tokio::time::timeout(Duration::from_secs(5), conn.closed())
                .await
                .expect("connection not closed");
            assert!(
                matches!(
                    err,
                    quinn::ConnectionError::TransportError(_)
                        | quinn::ConnectionError::ConnectionClosed(_)
                ),
                "{err}"
            );
            assert!(conn.open_bi().await.is_err() || conn.accept_bi().await.is_err());
            err.to_string()
        }
        Err(e) => {
            let mut s = e.to_string();
            let mut cur = std::error::Error::source(&e);
            while let Some(c) = cur {
                s = format!("{s}: {c}");
                cur = c.source();
            }
            s
        }
    };
    // The client learns which of its certificates was refused, and how to pin it.
    assert!(
        said.contains(mallory.fingerprint()) && said.contains("mig peers add"),
        "{said}"
    );
    let server_side = srv.await.unwrap();
    assert!(
        matches!(server_side, Err(TlsError::Accept { .. })),
        "{server_side:?}"
    );

    // Once pinned, the same client gets in.
    let allowed2 = AllowedPeers::new(HashSet::new());
    allowed2.insert(mallory.fingerprint());
    let server3 = endpoint(any(), &b, allowed2).unwrap();
    let srv = tokio::spawn({
        let server3 = server3.clone();
        async move { accept(&server3).await.unwrap().map(|_| ()) }
    });
    connect(
        &client,
        &mallory,
        &peer("host-b", &server3, b.fingerprint()),
    )
    .await
    .unwrap();
    srv.await.unwrap().unwrap();
}

#[tokio::test]
async fn unpinned_server_refused_at_handshake() {
    let (a, b, mallory) = (ident("host-a"), ident("host-b"), ident("mallory"));
    // Mallory listens where the client expects host-b, and would even accept the client.
    let server = endpoint(any(), &mallory, allowed(&[&a])).unwrap();
    let client = endpoint(any(), &a, AllowedPeers::default()).unwrap();
    let srv = tokio::spawn({
        let server = server.clone();
        async move { accept(&server).await.unwrap() }
    });
    let err = connect(&client, &a, &peer("host-b", &server, b.fingerprint()))
        .await
        .unwrap_err();
    assert!(matches!(err, TlsError::Handshake { .. }), "{err}");
    let text = format!("{err}: {:?}", std::error::Error::source(&err));
    assert!(text.contains("host-b"), "{text}");
    // The fingerprint presented and the one pinned are named, with what to do.
    let chain = {
        let mut s = err.to_string();
        let mut cur = std::error::Error::source(&err);
        while let Some(c) = cur {
            s = format!("{s}: {c}");
            cur = c.source();
        }
        s
    };
    assert!(
        chain.contains(mallory.fingerprint())
            && chain.contains(b.fingerprint())
            && chain.contains("mig peers add"),
        "{chain}"
    );
    eprintln!("{chain}");
    assert!(srv.await.unwrap().is_err());
}
