//! One integration test binary (cheap linking): each module is one area.

mod util;

mod boundary;
mod engine_props;
mod lab;
mod plan_golden;
mod showconf_wg;
