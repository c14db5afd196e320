//! Test fixtures: a throwaway PKI and an echoing ReverseTunnel server on 127.0.0.1.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use tether_protocol::tunnel::reverse_tunnel_client::ReverseTunnelClient;
use tether_protocol::tunnel::reverse_tunnel_server::{ReverseTunnel, ReverseTunnelServer};
use tether_protocol::tunnel::{AgentFrame, Data, ServerFrame, agent_frame, server_frame};
use tether_transport::{AgentConnectInfo, ServerTls, incoming, remote_addr_of};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

pub use tether_test_support::Pki;

/// The server side of `pki`: its certificate and key.
pub fn server_tls(pki: &Pki) -> ServerTls {
    tether_transport::load_server_tls(&pki.cert, &pki.key).unwrap()
}

/// Replies to every Data frame with the same bytes and to CloseSend with CloseSend. Reports
/// in response metadata how the agent connected, so tests see what the server saw.
struct Echo;

type FrameStream = Pin<Box<dyn Stream<Item = Result<ServerFrame, Status>> + Send>>;

#[tonic::async_trait]
impl ReverseTunnel for Echo {
    type ConnectStream = FrameStream;

    async fn connect(
        &self,
        request: Request<Streaming<AgentFrame>>,
    ) -> Result<Response<FrameStream>, Status> {
        let info = request
            .extensions()
            .get::<AgentConnectInfo>()
            .cloned()
            .ok_or_else(|| Status::internal("no AgentConnectInfo"))?;
        let remote = remote_addr_of(&request).ok_or_else(|| Status::internal("no address"))?;
        assert_eq!(remote, info.remote_addr());

        let frames = request.into_inner().filter_map(|frame| async move {
            match frame {
                Ok(AgentFrame {
                    frame: Some(agent_frame::Frame::Data(d)),
                }) => Some(Ok(ServerFrame {
                    frame: Some(server_frame::Frame::Data(d)),
                })),
                Ok(AgentFrame {
                    frame: Some(agent_frame::Frame::CloseSend(c)),
                }) => Some(Ok(ServerFrame {
                    frame: Some(server_frame::Frame::CloseSend(c)),
                })),
                Ok(_) => None,
                Err(status) => Some(Err(status)),
            }
        });
        let mut response = Response::new(Box::pin(frames) as FrameStream);
        response
            .metadata_mut()
            .insert("x-scheme", info.scheme().as_str().parse().unwrap());
        response.metadata_mut().insert(
            "x-remote-ip",
            info.remote_addr().ip().to_string().parse().unwrap(),
        );
        Ok(response)
    }
}

/// A running echo server; stops when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl TestServer {
    pub async fn start(tls: Option<ServerTls>) -> TestServer {
        let (listener, addr) = tether_test_support::tokio_listener().await;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ReverseTunnelServer::new(Echo))
                .serve_with_incoming_shutdown(incoming(listener, tls), async {
                    let _ = rx.await;
                }),
        );
        TestServer {
            addr,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Stops the server and checks it ended cleanly.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub fn data_frame(bytes: Vec<u8>) -> AgentFrame {
    AgentFrame {
        frame: Some(agent_frame::Frame::Data(Data { data: bytes.into() })),
    }
}

pub fn close_frame() -> AgentFrame {
    AgentFrame {
        frame: Some(agent_frame::Frame::CloseSend(
            tether_protocol::tunnel::CloseSend {},
        )),
    }
}

/// Opens a Connect stream; returns the sender of agent frames, the server's frames and the
/// response metadata.
pub async fn open(
    channel: Channel,
) -> (
    mpsc::Sender<AgentFrame>,
    Streaming<ServerFrame>,
    tonic::metadata::MetadataMap,
) {
    let mut client = ReverseTunnelClient::new(channel);
    let (tx, rx) = mpsc::channel(16);
    let response = client.connect(ReceiverStream::new(rx)).await.unwrap();
    let (metadata, stream, _) = response.into_parts();
    (tx, stream, metadata)
}

/// Sends `messages` one at a time, each answered before the next is sent (a real
/// bidirectional exchange), then half-closes and expects the server's CloseSend and the end.
pub async fn ping_pong(channel: Channel, messages: usize) -> tonic::metadata::MetadataMap {
    let (tx, mut replies, metadata) = open(channel).await;
    for i in 0..messages {
        let payload = format!("message {i}").into_bytes();
        tx.send(data_frame(payload.clone())).await.unwrap();
        let reply = replies.message().await.unwrap().unwrap();
        match reply.frame {
            Some(server_frame::Frame::Data(d)) => assert_eq!(d.data, payload),
            other => panic!("unexpected reply {other:?}"),
        }
    }
    tx.send(close_frame()).await.unwrap();
    let reply = replies.message().await.unwrap().unwrap();
    assert!(matches!(
        reply.frame,
        Some(server_frame::Frame::CloseSend(_))
    ));
    drop(tx);
    assert!(replies.message().await.unwrap().is_none());
    metadata
}

pub fn scheme_seen(metadata: &tonic::metadata::MetadataMap) -> String {
    metadata
        .get("x-scheme")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned()
}
