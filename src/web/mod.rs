//! The playground page (`GET /` and `/ui/...`): plain HTML, CSS and JavaScript modules with no
//! build step, compiled into the binary so `afa serve` needs no separate install and works
//! offline. The page talks to the server only through the public API (`/info`, `/ready`,
//! `/v1/jobs` and its events, images and maps), exactly as any other client would. This module
//! only holds the files; `api::ui` serves them.

/// One embedded file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asset {
    pub content_type: &'static str,
    pub bytes: &'static [u8],
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// The page itself, served at `/`.
pub const INDEX: Asset = Asset {
    content_type: HTML,
    bytes: include_bytes!("index.html"),
};

/// Every file under `/ui/`, by its name there. A fixed table: names are compared, never
/// joined to a filesystem path, so `..` and friends cannot reach anything else.
const ASSETS: &[(&str, Asset)] = &[
    (
        "style.css",
        Asset {
            content_type: CSS,
            bytes: include_bytes!("style.css"),
        },
    ),
    (
        "app.js",
        Asset {
            content_type: JS,
            bytes: include_bytes!("app.js"),
        },
    ),
    (
        "api.js",
        Asset {
            content_type: JS,
            bytes: include_bytes!("api.js"),
        },
    ),
    (
        "explorer.js",
        Asset {
            content_type: JS,
            bytes: include_bytes!("explorer.js"),
        },
    ),
];

/// The asset named `name` (the part of the path after `/ui/`), if there is one.
pub fn asset(name: &str) -> Option<Asset> {
    ASSETS.iter().find(|(n, _)| *n == name).map(|(_, a)| *a)
}

/// The names of every asset (for tests and listings).
pub fn asset_names() -> impl Iterator<Item = &'static str> {
    ASSETS.iter().map(|(n, _)| *n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_is_found_by_name_and_typed() {
        for name in asset_names() {
            let a = asset(name).unwrap();
            assert!(!a.bytes.is_empty(), "{name} is empty");
            let ext = name.rsplit('.').next().unwrap();
            let want = match ext {
                "js" => JS,
                "css" => CSS,
                other => panic!("unexpected asset type {other}"),
            };
            assert_eq!(a.content_type, want, "{name}");
        }
        assert_eq!(INDEX.content_type, HTML);
    }

    #[test]
    fn only_table_names_resolve() {
        for bad in [
            "",
            "../Cargo.toml",
            "..%2fCargo.toml",
            "/app.js",
            "./app.js",
            "APP.JS",
            "mod.rs",
            "index.html/../app.js",
        ] {
            assert!(asset(bad).is_none(), "{bad:?} resolved");
        }
    }

    #[test]
    fn the_page_references_only_assets_that_exist() {
        let html = std::str::from_utf8(INDEX.bytes).unwrap();
        for part in html.split("/ui/").skip(1) {
            let name: String = part
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
                .collect();
            assert!(asset(&name).is_some(), "index.html links /ui/{name}");
        }
        for name in asset_names().filter(|n| n.ends_with(".js")) {
            let js = std::str::from_utf8(asset(name).unwrap().bytes).unwrap();
            for part in js.split("from './").skip(1) {
                let dep: String = part.chars().take_while(|c| *c != '\'').collect();
                assert!(asset(&dep).is_some(), "{name} imports ./{dep}");
            }
        }
    }
}
