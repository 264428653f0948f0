//! The ParameterStatus values a server reported, kept packed: every pooled
//! and every relayed connection holds one set, so one small allocation
//! instead of two strings per parameter.

use bytes::BytesMut;

use crate::wire;

/// `name\0value\0` entries, each exactly a ParameterStatus body.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ServerParams {
    packed: Box<str>,
}

impl ServerParams {
    /// Sets `name` to `value`, replacing an earlier report of the same name.
    pub fn set(&mut self, name: &str, value: &str) {
        // Every session's set-up and reset report the same few again.
        if self.get(name) == Some(value) {
            return;
        }
        let mut packed = String::with_capacity(self.packed.len() + name.len() + value.len() + 2);
        for (n, v) in self.iter() {
            if n != name {
                push_entry(&mut packed, n, v);
            }
        }
        push_entry(&mut packed, name, value);
        self.packed = packed.into_boxed_str();
    }

    /// The value last reported for `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// Entries in the order first reported (a replaced one moves last).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        let mut fields = self.packed.split('\0');
        std::iter::from_fn(move || {
            let name = fields.next().filter(|n| !n.is_empty())?;
            Some((name, fields.next()?))
        })
    }

    /// Appends one ParameterStatus message per entry.
    pub fn encode(&self, out: &mut BytesMut) {
        for (name, value) in self.iter() {
            wire::parameter_status(out, name, value);
        }
    }
}

fn push_entry(packed: &mut String, name: &str, value: &str) {
    packed.push_str(name);
    packed.push('\0');
    packed.push_str(value);
    packed.push('\0');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_later_report_replaces_the_earlier_value() {
        let mut p = ServerParams::default();
        p.set("application_name", "");
        p.set("TimeZone", "UTC");
        p.set("application_name", "psql");
        assert_eq!(
            p.iter().collect::<Vec<_>>(),
            [("TimeZone", "UTC"), ("application_name", "psql")]
        );
    }

    #[test]
    fn empty_values_survive_and_encode_as_parameter_status() {
        let mut p = ServerParams::default();
        p.set("a", "");
        p.set("b", "x");
        let mut out = BytesMut::new();
        p.encode(&mut out);
        assert_eq!(&out[..], b"S\0\0\0\x07a\0\0S\0\0\0\x08b\0x\0");
    }

    #[test]
    fn an_empty_set_has_no_entries() {
        assert_eq!(ServerParams::default().iter().count(), 0);
    }
}
