//! TEMPORARY STUB (replaced by the planner branch).
pub trait TableInfo {
    fn sharded(&self, name: &str) -> Option<(&str, &str)>;
    fn is_reference(&self, name: &str) -> bool;
}
#[derive(Debug)]
pub struct Refusal { pub message: String, pub hint: String }
#[derive(Debug, Clone)]
pub struct ScatterPlan { pub partial_sql: String, pub visible: usize, pub merge: Merge, pub limit: Option<Bound>, pub offset: Option<Bound> }
#[derive(Debug, Clone, Copy)]
pub enum Bound { Const(u64), Param(usize) }
#[derive(Debug, Clone)]
pub enum Merge { Concat, Sorted { keys: Vec<SortKey> }, Combine { final_sql: String, partial_columns: usize } }
#[derive(Debug, Clone, Copy)]
pub struct SortKey { pub descending: bool, pub nulls_first: bool }
pub fn plan(sql: &str, _tables: &dyn TableInfo) -> Result<ScatterPlan, Refusal> {
    Ok(ScatterPlan { partial_sql: sql.to_string(), visible: 0, merge: Merge::Concat, limit: None, offset: None })
}
