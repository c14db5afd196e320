//! scratch
#[cfg(test)]
mod probe {
    fn p(s: &str) {
        let r = serde_saphyr::from_str::<Option<serde_json::Value>>(s);
        match r {
            Ok(v) => println!("{s:?} => OK {v:?}"),
            Err(e) => println!(
                "{s:?} => ERR loc={:?} disp={}",
                e.location().map(|l| (l.line(), l.column())),
                e.without_snippet()
            ),
        }
    }
    #[test]
    fn probe() {
        p("");
        p("# only comment\n");
        p("---\n");
        p("--- # c\n# x\n");
        p("a: 1\n1: x\ntrue: y\nn: null\nf: 1.5\nbig: 123456789012345678901234\nyes: on\n");
        p("a: [1, 2\nb: 3\n");
        p("a: 1\na: 2\n");
        p("a:\n  b: 1\n c: 2\n");
        p("a: &x [1,2]\nb: *x\nc: *y\n");
        p("- 1\n- 2\n");
        p("just a string\n");
        p("a: !!binary aGVsbG8=\nb: 0x1F\nc: 010\nd: 1_000\ne: .inf\n");
        let mut lol = String::from(
            "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
        );
        for i in 0..9u8 {
            let prev = (b'a' + i) as char;
            let cur = (b'b' + i) as char;
            lol.push_str(&format!("{cur}: &{cur} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"));
        }
        let r = serde_saphyr::from_str::<Option<serde_json::Value>>(&lol);
        println!(
            "lol => {:?}",
            r.as_ref().err().map(|e| e.without_snippet().to_string())
        );
        let r = serde_saphyr::from_str::<Option<serde_json::Value>>("a: 1\n---\nb: 2\n");
        println!(
            "multi => {:?}",
            r.as_ref().map_err(|e| e.without_snippet().to_string())
        );
    }
}
