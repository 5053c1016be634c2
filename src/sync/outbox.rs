//! The order in which a session's queued frames go out: each document's frames in the order
//! they were queued, and the parts of a large sync message taking turns with everything else,
//! so one large document does not hold back the small changes of the others.

use std::collections::VecDeque;

/// Encoded frames waiting for the connection, sans IO.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Single frames free to go next, with their document (None for control frames).
    quick: VecDeque<(Option<String>, Vec<u8>)>,
    /// Messages of several frames, and the later frames of their documents, in order; the
    /// first is being sent.
    slow: VecDeque<(Option<String>, VecDeque<Vec<u8>>)>,
    /// Whether the next turn goes to `quick`.
    quick_turn: bool,
}

impl Outbox {
    /// Queues the frames of one message for `doc` (None for frames about no document).
    pub fn push(&mut self, doc: Option<&str>, frames: Vec<Vec<u8>>) {
        let doc = doc.map(str::to_string);
        let behind = doc.is_some() && self.slow.iter().any(|(d, _)| *d == doc);
        if frames.len() > 1 || behind {
            self.slow.push_back((doc, frames.into()));
        } else {
            self.quick
                .extend(frames.into_iter().map(|f| (doc.clone(), f)));
        }
    }

    /// The next frame to write.
    pub fn pop(&mut self) -> Option<Vec<u8>> {
        self.quick_turn = !self.quick_turn;
        // A large message waits for the frames its document queued before it.
        let slow_waits = self
            .slow
            .front()
            .is_some_and(|(doc, _)| doc.is_some() && self.quick.iter().any(|(d, _)| d == doc));
        if (self.quick_turn || self.slow.is_empty() || slow_waits) && !self.quick.is_empty() {
            return self.quick.pop_front().map(|(_, frame)| frame);
        }
        let (_, frames) = self.slow.front_mut()?;
        let frame = frames.pop_front();
        if frames.is_empty() {
            self.slow.pop_front();
        }
        frame
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.quick.is_empty() && self.slow.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(tag: &str, n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| format!("{tag}{i}").into_bytes()).collect()
    }

    fn drain(outbox: &mut Outbox) -> Vec<String> {
        std::iter::from_fn(|| outbox.pop())
            .map(|f| String::from_utf8(f).unwrap())
            .collect()
    }

    #[test]
    fn large_messages_take_turns_and_each_document_keeps_its_order() {
        let mut outbox = Outbox::default();
        outbox.push(Some("a"), frames("a-early", 1));
        outbox.push(Some("big"), frames("big", 4));
        outbox.push(Some("a"), frames("a", 1));
        outbox.push(Some("big"), frames("big-later", 1));
        outbox.push(None, frames("summary", 1));
        outbox.push(Some("b"), frames("b", 1));
        let sent = drain(&mut outbox);
        assert_eq!(
            sent,
            [
                "a-early0",
                "big0",
                "a0",
                "big1",
                "summary0",
                "big2",
                "b0",
                "big3",
                "big-later0"
            ]
        );
        assert!(outbox.is_empty());
    }

    #[test]
    fn a_large_message_waits_for_its_documents_earlier_frames() {
        let mut outbox = Outbox::default();
        outbox.push(Some("x"), frames("x", 1));
        outbox.push(Some("y"), frames("y", 1));
        outbox.push(Some("big"), frames("big-early", 1));
        outbox.push(Some("big"), frames("big", 2));
        assert_eq!(
            drain(&mut outbox),
            ["x0", "y0", "big-early0", "big0", "big1"]
        );
    }
}
