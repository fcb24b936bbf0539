//! The world's vocabulary and captions: 4 colours x 3 shapes x 5 positions = 60 scenes, each
//! captioned exactly `a {colour} {shape} on the {position}` (or `... in the center`).
use std::fmt;
use std::str::FromStr;

/// Image side in pixels.
pub const IMAGE_SIZE: usize = 64;

macro_rules! vocabulary {
    ($name:ident { $($variant:ident => $word:literal),+ $(,)? }) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($variant),+ }

        impl $name {
            /// Every value, in caption order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The caption word.
            pub fn word(self) -> &'static str {
                match self { $($name::$variant => $word),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.word())
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                $name::ALL
                    .iter()
                    .copied()
                    .find(|v| v.word() == s)
                    .ok_or_else(|| format!("unknown {} '{s}'", stringify!($name).to_lowercase()))
            }
        }
    };
}

vocabulary!(Colour { Red => "red", Green => "green", Blue => "blue", Yellow => "yellow" });
vocabulary!(Shape { Circle => "circle", Square => "square", Triangle => "triangle" });
vocabulary!(Position {
    Left => "left",
    Right => "right",
    Top => "top",
    Bottom => "bottom",
    Center => "center",
});

impl Colour {
    /// The prototype colour (renders jitter around it; the judge picks the nearest).
    pub fn rgb(self) -> [f32; 3] {
        match self {
            Colour::Red => [210.0, 40.0, 40.0],
            Colour::Green => [40.0, 160.0, 60.0],
            Colour::Blue => [45.0, 75.0, 210.0],
            Colour::Yellow => [230.0, 195.0, 35.0],
        }
    }
}

impl Position {
    /// Where the shape's centroid sits, in pixels of a 64x64 image (x, y).
    pub fn anchor(self) -> (f32, f32) {
        match self {
            Position::Left => (18.0, 32.0),
            Position::Right => (46.0, 32.0),
            Position::Top => (32.0, 18.0),
            Position::Bottom => (32.0, 46.0),
            Position::Center => (32.0, 32.0),
        }
    }
}

/// What one picture shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Scene {
    pub colour: Colour,
    pub shape: Shape,
    pub position: Position,
}

impl Scene {
    /// Every scene, colour-major then shape then position (60 in all).
    pub fn all() -> Vec<Scene> {
        let mut out = Vec::with_capacity(60);
        for &colour in Colour::ALL {
            for &shape in Shape::ALL {
                for &position in Position::ALL {
                    out.push(Scene {
                        colour,
                        shape,
                        position,
                    });
                }
            }
        }
        out
    }

    /// The exact caption.
    pub fn caption(&self) -> String {
        match self.position {
            Position::Center => format!("a {} {} in the center", self.colour, self.shape),
            p => format!("a {} {} on the {p}", self.colour, self.shape),
        }
    }

    /// Reads a caption back (the inverse of `caption`).
    pub fn from_caption(caption: &str) -> Option<Scene> {
        let words: Vec<&str> = caption.split_whitespace().collect();
        match words.as_slice() {
            ["a", colour, shape, "on", "the", position] if *position != "center" => Some(Scene {
                colour: colour.parse().ok()?,
                shape: shape.parse().ok()?,
                position: position.parse().ok()?,
            }),
            ["a", colour, shape, "in", "the", "center"] => Some(Scene {
                colour: colour.parse().ok()?,
                shape: shape.parse().ok()?,
                position: Position::Center,
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sixty_distinct_captions_that_read_back() {
        let scenes = Scene::all();
        assert_eq!(scenes.len(), 60);
        let captions: std::collections::HashSet<String> =
            scenes.iter().map(|s| s.caption()).collect();
        assert_eq!(captions.len(), 60);
        for s in &scenes {
            assert_eq!(Scene::from_caption(&s.caption()), Some(*s));
        }
        assert_eq!(
            Scene::all()[0].caption(),
            "a red circle on the left",
            "colour-major order"
        );
        assert_eq!(Scene::from_caption("a red circle on the center"), None);
        assert_eq!(Scene::from_caption("a pink circle on the left"), None);
    }
}
