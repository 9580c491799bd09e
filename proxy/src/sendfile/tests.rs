use super::*;

#[test]
fn heap_buffers_are_written_from_memory() {
    let (a, b) = (vec![1u8; 10], vec![2u8; 20]);
    let bufs = [IoSlice::new(&a), IoSlice::new(&b)];
    let (p, file) = plan(&bufs);
    assert_eq!(
        p,
        Plan {
            plain: 2,
            file_offset: None
        }
    );
    assert!(file.is_none());
}
