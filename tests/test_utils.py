import torch

import utils


def make_sample(index, objects):
    generator = torch.Generator().manual_seed(index)
    image = torch.randint(0, 256, (3, 5 + index, 7), dtype=torch.uint8, generator=generator)
    target = {
        "boxes": torch.rand(objects, 4, generator=generator),
        "masks": torch.randint(
            0, 2, (objects, 5 + index, 7), dtype=torch.uint8, generator=generator
        ),
        "labels": torch.arange(objects, dtype=torch.int64),
        "image_id": index,
    }
    return image, target


class Samples(torch.utils.data.Dataset):
    """Images of several sizes, one without objects (empty boxes and masks)."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return make_sample(index, objects=index % 3)


def assert_same_batch(batch, expected):
    images, targets = batch
    expected_images, expected_targets = expected
    for image, expected_image in zip(images, expected_images, strict=True):
        assert torch.equal(image, expected_image)
    for target, expected_target in zip(targets, expected_targets, strict=True):
        assert target.keys() == expected_target.keys()
        for key, value in target.items():
            if torch.is_tensor(value):
                assert value.dtype == expected_target[key].dtype
                assert torch.equal(value, expected_target[key])
            else:
                assert value == expected_target[key]


def test_one_shared_buffer_holds_the_batch_unchanged():
    samples = [make_sample(index, objects=index % 3) for index in range(4)]
    images, targets = zip(*samples, strict=True)
    shared = utils.in_one_shared_buffer(images, targets)
    assert_same_batch(shared, (images, targets))
    storages = {image.untyped_storage().data_ptr() for image in shared[0]}
    storages |= {t["masks"].untyped_storage().data_ptr() for t in shared[1]}
    assert len(storages) == 1 and shared[0][0].is_shared()


def test_batches_from_workers_equal_batches_built_in_process():
    def batches(workers):
        loader = torch.utils.data.DataLoader(
            Samples(), batch_size=2, num_workers=workers, collate_fn=utils.collate_fn
        )
        return list(loader)

    for batch, expected in zip(batches(2), batches(0), strict=True):
        assert_same_batch(batch, expected)
